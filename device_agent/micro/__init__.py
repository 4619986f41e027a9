"""MicroPython board adapter."""
