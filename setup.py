"""Build script: compiles the Cython hot path ``pgrepl/_core/core.pyx`` (and the .pxi units it
includes) into ``pgrepl._core.core``."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "pgrepl._core.core",
        ["pgrepl/_core/core.pyx"],
        extra_compile_args=["-O3"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "embedsignature": True,
        },
    )
)
