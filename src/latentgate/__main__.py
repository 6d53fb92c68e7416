from latentgate.cli import main

main()
