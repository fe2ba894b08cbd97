"""`python -m cnn_ext.visualize`: pictures of a trained model, from cnn_ext.app.visualize."""

from .app.visualize import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
