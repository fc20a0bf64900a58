from rsfusion.lightning_modules.commands.cli import main

main()
