"""The hooks a ckpt-surgeon plugin can implement.

A plugin is a module (or object) with functions decorated by ``ckptsurgeon.hookimpl`` and made
known through the ``ckptsurgeon`` entry-point group::

    # pyproject.toml of your package
    [project.entry-points.ckptsurgeon]
    myplugin = "my_package.my_plugin"

Every hook returns a list; results from all plugins are collected and checked for name
conflicts (a conflict is reported by ``ckpt-surgeon plugins`` and the first registration wins),
so nothing depends on load order.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("ckptsurgeon")
hookimpl = pluggy.HookimplMarker("ckptsurgeon")


class CkptSurgeonSpecs:
    @hookspec
    def ckptsurgeon_formats(self):
        """Return a list of :class:`ckptsurgeon.types.FormatSpec` this plugin reads or writes.

        Example::

            from ckptsurgeon import hookimpl
            from ckptsurgeon.types import FormatSpec

            def _sniff(path, head):
                return head.startswith(b"NPZ!")

            @hookimpl
            def ckptsurgeon_formats():
                return [FormatSpec(name="npz", extensions=(".npz",), sniff=_sniff,
                                   load=load_npz, save=save_npz)]
        """

    @hookspec
    def ckptsurgeon_commands(self):
        """Return a list of :class:`click.Command` objects to add to the ``ckpt-surgeon`` CLI.

        Commands are loaded lazily: only when the CLI lists or runs commands. Keep heavy
        imports (torch) inside the command's function.

        Example::

            import click
            from ckptsurgeon import hookimpl

            @click.command("count")
            @click.argument("path")
            def count(path):
                import ckptsurgeon
                click.echo(len(ckptsurgeon.load(path).state))

            @hookimpl
            def ckptsurgeon_commands():
                return [count]
        """

    @hookspec
    def ckptsurgeon_operations(self):
        """Return a list of :class:`ckptsurgeon.types.Operation` to expose in the Python API.

        ``ckptsurgeon.<name>(...)`` resolves to the operation's function.

        Example::

            @hookimpl
            def ckptsurgeon_operations():
                return [Operation("halve", halve, "cast floating tensors to float16")]
        """

    @hookspec
    def ckptsurgeon_model_transforms(self):
        """Return a list of :class:`ckptsurgeon.types.ModelTransform`.

        ``verify`` applies the transforms a surgery recorded in a checkpoint (by name) to the
        freshly built reference model, so the second model has the new architecture.

        Example::

            def _to_gn(model, params):
                swap_bn_for_gn(model, groups=params["groups"])
                return model

            @hookimpl
            def ckptsurgeon_model_transforms():
                return [ModelTransform("bn-to-gn", _to_gn)]
        """


HOOK_NAMES = [n for n in vars(CkptSurgeonSpecs) if n.startswith("ckptsurgeon_")]
