"""Build script: compiles the Cython hot path ``pgrepl/_decode.pyx`` into ``pgrepl._decode``."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "pgrepl._decode",
        ["pgrepl/_decode.pyx"],
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
