from ringbench.cli import main

main()
