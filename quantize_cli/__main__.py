"""``python -m quantize_cli`` runs the ``qz`` command line."""

from .cli.main import main

if __name__ == "__main__":
    main()
