"""`python -m seedvr.tiny`: see seedvr/tools/tiny.py."""

from seedvr.tools.tiny import main

if __name__ == "__main__":
    main()
