# The package list is computed so that every sub-package of passes/ and targets/ lands in the
# wheel under its remapped name (a package missing from `packages` silently drops out).
from setuptools import find_packages, setup

packages = find_packages(include=["graphopt", "graphopt.*"])
packages += ["graphopt.passes" + p[len("passes"):] for p in find_packages(include=["passes", "passes.*"])]
packages += ["graphopt.targets" + p[len("targets"):] for p in find_packages(include=["targets", "targets.*"])]
setup(packages=packages)
