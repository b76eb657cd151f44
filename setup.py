from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension("replicator._decode", ["replicator/_decode.pyx"], extra_compile_args=["-O2"]),
    Extension("replicator.pipeline._pipe", ["replicator/pipeline/_pipe.pyx"],
              extra_compile_args=["-O2"]),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    )
)
