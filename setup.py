"""The compiled modules (the rest of the configuration is pyproject.toml): `features._kernel`, the
window reads, `features._table`, the compact table of per-transaction state, and `models._river`, the
online model's scaler updates.

Optional: without a C compiler the install goes on; `features.plan` runs the same plans in Python,
slower, with the same values, `features.table.Table` is a dict (same behaviour, more memory), and
`models.online` runs River's own scaler code (same floats).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "features._kernel",
            ["features/_kernel.c"],
            optional=True,
            extra_compile_args=["-O2", "-ffp-contract=off"],
        ),
        Extension("features._table", ["features/_table.c"], optional=True, extra_compile_args=["-O2"]),
        Extension(
            "models._river",
            ["models/_river.c"],
            optional=True,
            extra_compile_args=["-O2", "-ffp-contract=off"],
        ),
    ]
)
