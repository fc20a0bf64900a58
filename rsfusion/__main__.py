from rsfusion.lightning_modules.commands.entry import main

main()
