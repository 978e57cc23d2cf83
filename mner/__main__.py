"""``python -m mner`` (and ``torchrun -m mner``): the command line."""

from mner.pipeline.cli import main

if __name__ == "__main__":
    main()
