"""What keeps a long train.py run safe: errors, signals, ranks agreeing, checkpoints and the run
folder, the step's checks, image files. Nothing in this package changes what is learned."""
