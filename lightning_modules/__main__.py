from lightning_modules.cli import main

main()
