"""The `billion` command line: a click group whose help is the docstrings.

Each command lives in billion/commands/<name>.py (options wired to a task
module) and is discovered here. Domain errors (UserError) become one-line
click errors here and nowhere else; Ctrl-C ends with exit code 130 after the
command has saved what it had.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import click

from backends.types import UserError


class BillionGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            ctx.exit(130)
        except MemoryError:
            raise click.ClickException("out of memory; try a smaller --dtype, --quantize int8 or a smaller model") \
                from None


@click.group(cls=BillionGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="billion")
def cli():
    """Run, measure, fine-tune and accelerate 1B-class language models on MLX and PyTorch.

    Every command takes --backend mlx|torch|auto|all: run it on one engine, or on every
    installed engine in turn on the same weights, and compare.

    Models: an alias (tinyllama, llama-3.2-1b, stablelm-2-1.6b, pythia-1b), a Hub id, a local
    HF folder, random:<alias> (real architecture, seeded random weights, no download) or
    tiny:<alias> (toy size, for tests).
    """


def _register_commands() -> None:
    import billion.commands as pkg

    for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"billion.commands.{mod.name}")
        for obj in vars(module).values():
            if isinstance(obj, click.Command) and obj.callback.__module__ == module.__name__:
                cli.add_command(obj)


_register_commands()


def main() -> None:
    cli(prog_name="billion")


if __name__ == "__main__":
    sys.exit(main())
