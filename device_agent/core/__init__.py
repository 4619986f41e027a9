"""Portable logic with no dependency beyond the language itself.

Modules here also run on MicroPython: no dataclasses, enum, typing or
third-party imports at run time.
"""
