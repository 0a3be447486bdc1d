from sapling.cli import main

main()
