"""Export a trained field: textured meshes and turntable videos, one module per stage.

The modules import trimesh, PyMCubes, xatlas and imageio lazily, inside the functions that need
them, so importing this package (and ``nfsd-nerf --help``, which reads :mod:`.formats`) stays fast.

* :mod:`.extract`: ``extract_mesh(field, ...)`` -> ``trimesh.Trimesh`` in world units.
* :mod:`.texture`: ``bake_texture`` / ``vertex_colors_from_albedo`` colour it from the albedo.
* :mod:`.formats`: the table ``FORMATS`` (GLB, OBJ, PLY) and ``write_mesh``, atomic.
* :mod:`.pipeline`: ``export_field`` / ``export_run`` do all of it (``nfsd-nerf export``).
* :mod:`.video`: ``render_turntable(field, background, out_dir=...)`` -> MP4 (and GIF) paths;
  ``estimate_seconds`` projects its run time; ``render_run_video`` loads a run first.
"""
