"""ckpt-surgeon's first-party plugins, installed as ``ckptsurgeon.plugins`` and registered
through the ``ckptsurgeon`` entry-point group exactly like third-party plugins."""
