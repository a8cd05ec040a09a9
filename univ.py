"""Run univ from a checkout: `python univ.py ARGS` is the same as `univ ARGS`."""

from univ.cli import main

if __name__ == "__main__":
    main()
