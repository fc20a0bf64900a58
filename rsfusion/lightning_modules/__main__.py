from rsfusion.lightning_modules.cli import main

main()
