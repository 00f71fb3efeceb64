from chatrl.cli import main

main()
