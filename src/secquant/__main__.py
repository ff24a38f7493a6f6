"""`python -m secquant`: the same CLI as the `secquant` console script."""

if __name__ == "__main__":
    from .cli import main

    main()
