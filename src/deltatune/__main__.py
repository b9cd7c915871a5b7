"""``python -m deltatune`` (and ``torchrun -m deltatune``) run the command line."""

from deltatune.cli import main

if __name__ == "__main__":
    main()
