"""Reading weight files safely, in one place.

* ``safe_load``: no file ever runs code while it is read (``load_guard``, weights-only unpickling
  with an allow-list, a restricted TorchScript reader);
* ``formats``: what a file from elsewhere is (official MAE/DeepMIM, timm, Hugging Face folders) and
  its encoder in timm's layout, read from shapes before any tensor;
* ``sources``: where a pretrained encoder comes from (a run, a checkpoint, an export or a file).
"""
