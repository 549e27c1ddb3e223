from fashion_tagger.cli import main

main()
