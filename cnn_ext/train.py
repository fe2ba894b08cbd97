"""`python -m cnn_ext.train`: the MNIST trainer, which lives in cnn_ext.app (see cnn_ext.app.cli)."""

from .app.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
