from chatterbox.testing.checkpoints import main

main()
