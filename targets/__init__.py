"""Targets that turn optimized IR into artifacts, installed as `graphopt.targets`."""

if __name__ != "graphopt.targets":  # pragma: no cover - guards against a second import as `targets`
    raise ImportError(
        "targets/ must be imported as graphopt.targets (install graphopt with `pip install -e .` "
        "and run pytest with --import-mode=importlib)"
    )
