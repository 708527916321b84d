"""Checkpoint conversion: the authors' checkpoints to our format (`mlra convert original`) and MLA models into the
family (`mlra convert mla`). Installed as `modeling_mlra.conversion`."""
