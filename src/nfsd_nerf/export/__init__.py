"""Export a trained field: textured meshes (:mod:`.mesh`) and turntable videos (:mod:`.video`).

Both modules import trimesh, PyMCubes, xatlas and imageio lazily, inside the functions that need
them, so importing this package (and ``nfsd-nerf --help``) stays fast.

* ``mesh.extract_mesh(field, ...)`` -> ``trimesh.Trimesh`` in world units;
  ``mesh.bake_texture`` / ``mesh.vertex_colors_from_albedo`` colour it; ``mesh.write_mesh``
  writes GLB / OBJ / PLY atomically; ``mesh.export_field`` / ``mesh.export_run`` do all of it.
* ``video.render_turntable(field, background, out_dir=...)`` -> MP4 (and GIF) paths;
  ``video.estimate_seconds`` projects its run time; ``video.render_run_video`` loads a run first.
"""
