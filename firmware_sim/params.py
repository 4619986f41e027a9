"""Option types the ``firmware-sim`` commands share: paths and names."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from cryptography import x509

from firmware_sim.ca import check_name, read_small_file
from firmware_sim.errors import CAError

_F = TypeVar("_F", bound=Callable[..., Any])


class NonEmptyPath(click.Path):
    """A click.Path that refuses "", which would mean the working dir."""

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: Any
    ) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("must not be empty", param, ctx)
        return super().convert(value, param, ctx)


class RegularFile(NonEmptyPath):
    """A regular file that exists: not a FIFO or a device that blocks."""

    def __init__(self) -> None:
        super().__init__(path_type=Path, dir_okay=False, exists=True)

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: Any
    ) -> Any:
        path = super().convert(value, param, ctx)
        if not Path(path).is_file():
            self.fail(f"{path} is not a regular file", param, ctx)
        return path


class CertificateFile(RegularFile):
    """A regular file holding at least one PEM certificate, as TLS wants.

    Found out by TLS, a file without one (a key given by mistake, say)
    shows up only as a broker certificate that cannot be verified.
    """

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: Any
    ) -> Any:
        path = super().convert(value, param, ctx)
        try:
            data = read_small_file(Path(path), "a certificate file")
        except (OSError, CAError) as exc:
            self.fail(str(exc), param, ctx)

        try:
            certificates = x509.load_pem_x509_certificates(data)
        except ValueError:
            certificates = []
        if not certificates:
            self.fail(f"{path} holds no PEM certificate", param, ctx)
        return path


class DirectoryPath(NonEmptyPath):
    """A directory that exists or could be made: no file on its path."""

    def __init__(self) -> None:
        super().__init__(path_type=Path, file_okay=False)

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: Any
    ) -> Any:
        path = super().convert(value, param, ctx)
        blocker = file_on_path(Path(path))
        if blocker is not None:
            self.fail(f"{blocker} is not a directory", param, ctx)
        return path


def directory_option(
    *names: str, default: str, help: str, envvar: str | None = None
) -> Callable[[_F], _F]:
    """An option naming one of the simulator's directories.

    Each has a default relative to the working directory, shown in the
    help so that a person sees where files will go before they do.
    """
    return click.option(
        *names,
        type=DirectoryPath(),
        default=Path(default),
        show_default=True,
        envvar=envvar,
        help=help,
    )


def ca_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Click callback: a CA name that fits the certificates made with it."""
    try:
        return check_name(value)
    except CAError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def file_on_path(path: Path) -> Path | None:
    """The first thing on the way to ``path`` that is not a directory."""
    for step in reversed([path, *path.parents]):
        if os.path.lexists(step) and not step.is_dir():
            return step
    return None
