"""Build the Cython hot path (src/pgmulti/_codec.pyx).

PGMULTI_DEBUG=1 compiles the codec's invariant checks in; PGMULTI_ANNOTATE=1 writes the
`cython -a` HTML report and enables line tracing for profilers.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("PGMULTI_DEBUG") == "1"
annotate = os.environ.get("PGMULTI_ANNOTATE") == "1"

directives = {"language_level": "3", "embedsignature": True}
macros = [("PGMULTI_DEBUG", "1" if debug else "0")]
if annotate:
    directives["linetrace"] = True
    macros.append(("CYTHON_TRACE", "1"))

extensions = [
    Extension(
        "pgmulti._codec",
        ["src/pgmulti/_codec.pyx"],
        define_macros=macros,
        extra_compile_args=["-O2"],
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives, annotate=annotate))
