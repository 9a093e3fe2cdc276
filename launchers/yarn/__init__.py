"""The YARN ApplicationMaster that runs a kernel launcher inside a YARN application (see README.md)."""

from .build_am import AM_MAIN_CLASS, build_am_jar

__all__ = ["AM_MAIN_CLASS", "build_am_jar"]
