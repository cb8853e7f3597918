"""The one compiled module, `features._kernel` (the rest of the configuration is pyproject.toml).

Optional: without a C compiler the install goes on and `features.plan` runs the same plans in
Python, slower, with the same values.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("features._kernel", ["features/_kernel.c"], optional=True, extra_compile_args=["-O2"]),
    ]
)
