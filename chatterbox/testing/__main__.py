from chatterbox.testing import main

main()
