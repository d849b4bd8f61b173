"""`python -m launcher` and the `launcher` script. SIGTERM is caught before the heavy imports
(about 2 s), so that a signal during them also ends the way ending.py says."""
import sys

from .ending import catch_sigterm, conclude, wants_json


def main() -> None:
    catch_sigterm()
    try:
        from .cli import main as cli
    except KeyboardInterrupt as e:
        sys.exit(conclude(e, *wants_json(sys.argv[1:])))
    cli()


if __name__ == "__main__":
    main()
