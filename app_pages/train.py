"""Train page: launch training jobs, watch them live, compare runs, read run reports, promote models.

Thin layer: widgets and layout. Training runs as a job of ``covidscan.jobs`` (never inside this
script run), and everything shown is read back from the job runner and the run directories, so
a browser reload or an app restart loses nothing; the selected run is kept in the URL (``?job=``).
The work is done by ``covidscan.runs``.
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from app_pages import charts, ui
from covidscan import catalog, run_report, runs
from covidscan.errors import CovidscanError
from covidscan.metric_names import split_name

KIND_NAMES = {
    "covid-ct": "COVID-CT folder (CT_COVID/, CT_NonCOVID/, Data-split/)",
    "folder": "Class-per-folder (one sub-folder per class, optional train/ val/)",
    "ieee8023": "ieee8023 covid-chestxray (metadata.csv + images/)",
}
AUGMENT_NAMES = {"none": "None", "light": "Light (crop, flip)", "strong": "Strong (crop, flip, rotate, contrast)"}
BALANCE_NAMES = {"none": "None", "sampler": "Oversample rare classes", "loss": "Weight the loss by class"}
STATUS_COLORS = {"queued": "gray", "running": "blue", "succeeded": "green", "failed": "red", "cancelled": "orange"}
REFRESH_SECONDS = 2.0
TABLE_REFRESH_SECONDS = 5.0
LOG_LINES = 40
STATUS_COLUMN_PX = 95  # fits "succeeded" and "cancelled" (auto width cut them to "succeede")
LR_FINDER_STEPS = 40
JOB_KEY = "train_job"
LR_RESULT_KEY = "train_lr_result"
REPORT_KEY = "train_report_open"
# Streamlit forgets the value of a widget that is not rendered (another page is shown), so the form's
# values are copied to this plain session-state key after every run and restored from it.
FORM_STORE_KEY = "train_form_saved"
# Widget keys of TrainConfig fields (default: "train_<field>"), and the form's keys that are not fields.
WIDGET_KEYS = {"dataset": "train_kind", "freeze_epochs": "train_freeze", "name": "train_model_name"}
EXTRA_FORM_KEYS = ("train_val_fraction", "train_job_name", "train_cv_folds", "train_cv_eval_sizes",
                   "train_cv_ssl_epochs")
FORM_DEFAULTS = {"train_kind": "covid-ct", "train_val_fraction": 0.2}

st.title("Train")
ui.research_note()


# ------------------------------------------------------------------ helpers
def job_runner():
    """The configured job runner (cheap to create: it opens the job database)."""
    from covidscan.jobs import get_runner

    return get_runner()


@st.cache_data(ttl=30, show_spinner="Reading the dataset…", max_entries=16)
def cached_preview(kind: str, root: str, val_fraction: float):
    options = {"val_fraction": val_fraction} if kind != "covid-ct" else {}
    return runs.dataset_preview(kind, root, **options)


def _on_arch_change() -> None:
    from covidscan.models import get_spec

    from covidscan.models import pretrained_available

    arch = st.session_state["train_arch"]
    st.session_state["train_image_size"] = get_spec(arch).input_size
    st.session_state["train_pretrained"] = pretrained_available(arch)  # on whenever the weights are here


def _on_kind_change() -> None:
    from covidscan.training.form import default_modality

    st.session_state[widget_key("modality")] = default_modality(st.session_state["train_kind"])


def _use_suggested_lr() -> None:
    result = st.session_state.get(LR_RESULT_KEY)
    if result is not None and result.suggestion is not None:
        st.session_state["train_lr"] = float(f"{result.suggestion:.1e}")


def widget_key(name: str) -> str:
    """The session-state key of a TrainConfig field's widget."""
    return WIDGET_KEYS.get(name, f"train_{name}")


def form_keys() -> list[str]:
    from covidscan.training.form import form_fields

    return [widget_key(spec.name) for spec in form_fields()] + list(EXTRA_FORM_KEYS)


def restore_form() -> None:
    """Give every form widget its value: the one kept for this session, else the field's default."""
    from covidscan.models import DEFAULT_ARCHITECTURE, get_spec, pretrained_available
    from covidscan.training.form import default_modality, form_fields

    state = st.session_state
    for key, value in state.get(FORM_STORE_KEY, {}).items():
        if key not in state:  # dropped while another page was shown
            state[key] = value
    for key, value in FORM_DEFAULTS.items():
        state.setdefault(key, value)
    state.setdefault("train_arch", DEFAULT_ARCHITECTURE)
    state.setdefault("train_pretrained", pretrained_available(state["train_arch"]))
    state.setdefault("train_image_size", get_spec(state["train_arch"]).input_size)
    state.setdefault("train_modality", default_modality(state["train_kind"]))
    for spec in form_fields():
        value = spec.default
        if spec.kind == "sizes":
            value = ",".join(str(v) for v in value or [])
        elif spec.kind == "text" and value is None:
            value = ""
        state.setdefault(widget_key(spec.name), value)


def remember_form() -> None:
    state = st.session_state
    state[FORM_STORE_KEY] = {key: state[key] for key in form_keys() if key in state}


def form_config():
    """A TrainConfig from the form's widgets (not yet validated)."""
    from covidscan.training.form import config_from_form, form_fields

    state = st.session_state
    values = {spec.name: state.get(widget_key(spec.name)) for spec in form_fields()}
    values["dataset_options"] = {} if values["dataset"] == "covid-ct" else {"val_fraction": float(state["train_val_fraction"])}
    return config_from_form(values)


def field_widget(container, name: str, **kwargs):
    """The widget of one TrainConfig field, labelled and explained by the field itself."""
    from covidscan.training.form import field_by_name

    spec = field_by_name(name)
    key, options = widget_key(name), {"help": spec.help or None, **kwargs}
    if spec.kind == "toggle":
        return container.toggle(spec.label, key=key, **options)
    if spec.kind == "radio":
        return container.radio(spec.label, list(spec.choices), key=key, horizontal=True, **options)
    if spec.kind == "select":
        return container.selectbox(spec.label, list(spec.choices), key=key, **options)
    if spec.kind == "number":
        cast = spec.number_type
        bounds = {k: cast(spec.hint(k)) for k in ("min", "max", "step") if spec.hint(k) is not None}
        return container.number_input(spec.label, min_value=bounds.get("min"), max_value=bounds.get("max"),
                                      step=bounds.get("step", cast(1)), format=spec.hint("format"), key=key, **options)
    return container.text_input(spec.label, key=key, **options)


# ------------------------------------------------------------------ the form
def launch_form(expanded: bool) -> None:
    from app_pages.imagenet_upload import imagenet_weights_panel
    from covidscan.models import get_spec, list_architectures
    from covidscan.training.form import form_fields

    state = st.session_state
    restore_form()
    with st.expander("New training run", expanded=expanded, icon=":material/add_circle:"):
        left, right = st.columns([1, 2])
        kind = field_widget(left, "dataset", format_func=KIND_NAMES.get, on_change=_on_kind_change)
        root = field_widget(right, "root", placeholder="/path/to/dataset",
                            help="A folder on the machine that runs the app.")
        val_fraction = 0.2
        if kind != "covid-ct":
            val_fraction = st.slider("Validation fraction (when the folder has no val split)", 0.05, 0.5, step=0.05,
                                     key="train_val_fraction")
        preview_ok = False
        if root.strip():
            try:
                preview = cached_preview(kind, root.strip(), val_fraction)
            except CovidscanError as exc:
                st.error(str(exc), icon=":material/error:")
            else:
                preview_ok = "train" in preview.index and "val" in preview.index
                st.caption("Images per split and class")
                st.dataframe(preview, width="content")
                if not preview_ok:
                    st.error("Training needs a train and a val split.", icon=":material/error:")
        else:
            st.info("Name a dataset folder to check it and see its classes per split.", icon=":material/folder_open:")

        st.markdown("**Model**")
        c1, c2, c3 = st.columns(3)
        arch = c1.selectbox("Architecture", list_architectures(), key="train_arch", on_change=_on_arch_change)
        spec = get_spec(arch)
        if not spec.has_imagenet_weights:
            state["train_pretrained"] = False
        field_widget(c2, "pretrained", disabled=not spec.has_imagenet_weights)
        if not spec.has_imagenet_weights:
            c2.caption(f"{arch} has no ImageNet weights: it starts from random weights.")
        else:
            imagenet_weights_panel(c2, arch)  # cached or downloaded at launch; upload to import offline
        modality = field_widget(c3, "modality", help="Stored in the model card; CT models apply the lung window "
                                                     "to DICOM files.")
        if modality is None:
            c3.warning("Choose CT or X-ray: a class-per-folder dataset can hold either.", icon=":material/help:")

        st.markdown("**Schedule**")
        c1, c2, c3, c4 = st.columns(4)
        field_widget(c1, "epochs")
        field_widget(c2, "image_size")
        field_widget(c3, "batch_size")
        field_widget(c4, "freeze_epochs")
        c1, c2, c3, c4 = st.columns(4)
        field_widget(c1, "lr")
        field_widget(c2, "augment", format_func=AUGMENT_NAMES.get)
        field_widget(c3, "balance", format_func=BALANCE_NAMES.get)
        gpu = _gpu_available()
        field_widget(c4, "device", help="auto uses the GPU when there is one." + ("" if gpu else " No GPU is visible here."))

        with st.expander("Advanced", icon=":material/tune:"):
            columns = st.columns(3)
            for index, advanced in enumerate(form_fields(advanced=True)):
                field_widget(columns[index % 3], advanced.name)

        lr_col, _ = st.columns([1, 3])
        if lr_col.button("Find learning rate", icon=":material/query_stats:", disabled=not preview_ok,
                         help=f"Runs a {LR_FINDER_STEPS}-step learning-rate range test on the training split."):
            run_lr_finder()
        show_lr_finder()

        st.markdown("**Run**")
        c1, c2, c3 = st.columns([2, 2, 1])
        job_name = c1.text_input("Run name", key="train_job_name", placeholder="e.g. ct-mobilenet-lr3e-4",
                                 help="How the run is listed; defaults to its id.")
        field_widget(c2, "name", placeholder=f"{arch}-{kind}")
        cv_folds = c3.number_input("Cross-validation folds", 0, 10, step=1, key="train_cv_folds",
                                   help="0: one run on the train/val split. 2 or more: pool train and val, train one "
                                        "model per fold (patients and duplicate images never split across folds), "
                                        "and estimate the recipe from out-of-fold predictions with 95% intervals.")
        launch_clicked = st.button("Launch training" if not cv_folds else f"Launch {cv_folds}-fold cross-validation",
                                   type="primary", icon=":material/rocket_launch:",
                                   disabled=not preview_ok or modality is None or cv_folds == 1)
        if cv_folds == 1:
            c3.caption("Use 0 (no cross-validation) or at least 2 folds.")
        eval_sizes = cv_eval_sizes_widget() if cv_folds >= 2 else []
        refit = cv_folds >= 2 and st.checkbox(
            "Ship one model refitted on all images", key="train_cv_refit",
            help="After the folds, train the recipe once more on all pooled images (less a small watch carve, where "
                 "its input gate is calibrated) and ship that one model instead of the fold models' ensemble. The "
                 "estimate stays the fold models' out-of-fold one. Cheaper to run, and often better when data is scarce.")
        ssl_epochs = 0
        if cv_folds >= 2:
            ssl_epochs = st.columns([1, 2])[0].number_input(
                "SimCLR pretraining per fold (epochs; 0: off)", 0, 1000, step=10,
                key="train_cv_ssl_epochs",
                help="Before each fold model is fine-tuned, pretrain its backbone contrastively on that fold's own "
                     "training images (labels unused, never its held-out fold). Heavy: a GPU is advised.")
        remember_form()
        if launch_clicked:
            launch(job_name, int(cv_folds), eval_sizes, refit, int(ssl_epochs))


def cv_eval_sizes_widget() -> list[int]:
    """Candidate inference sizes of a cross-validation: each held-out fold is scored at every one."""
    from covidscan.cv import suggested_eval_sizes

    image_size = st.session_state.get(widget_key("image_size")) or 224
    choices = suggested_eval_sizes(int(image_size))
    key = "train_cv_eval_sizes"
    # Sizes suggested for an earlier training size are dropped (a multiselect refuses values it does not offer).
    if key in st.session_state:
        st.session_state[key] = [size for size in st.session_state[key] if size in choices]
    return st.multiselect(
        "Candidate inference sizes (px)", choices, key=key, placeholder=f"the training size ({image_size} px)",
        help="Each held-out fold is scored at every size chosen here, and the size is chosen out of fold "
             "(each fold at the size best on the other folds). Models trained on random crops often score "
             "best a little above their training size.")


def _gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_lr_finder() -> None:
    from covidscan.training import find_lr

    try:
        config = form_config()
        with st.spinner(f"Running the learning-rate range test ({LR_FINDER_STEPS} steps)…"):
            st.session_state[LR_RESULT_KEY] = find_lr(config, num_steps=LR_FINDER_STEPS)
        st.session_state[LR_RESULT_KEY + "_for"] = (f"{config.arch}, {config.resolved_sizes()[-1]} px, batch "
                                                    f"{config.batch_size}, on {Path(config.root).name}")
    except CovidscanError as exc:
        st.error(f"The learning-rate finder could not run: {exc}", icon=":material/error:")


def show_lr_finder() -> None:
    result = st.session_state.get(LR_RESULT_KEY)
    if result is None:
        return
    if len(result.lrs) < 3:
        st.warning("The range test stopped too early to draw a curve (the loss diverged at once).")
        return
    st.altair_chart(charts.lr_finder_chart(result), width="stretch")
    st.caption(f"Range test for {st.session_state.get(LR_RESULT_KEY + '_for', 'the form as it was')}: pick a rate "
               "where the loss still falls steeply, before its minimum.")
    if result.suggestion is None:
        st.caption("No clear descent in the loss: keep the default or try a smaller batch.")
    else:
        st.button(f"Use the suggested learning rate ({result.suggestion:.1e})", on_click=_use_suggested_lr,
                  icon=":material/check:")


def launch(job_name: str, cv_folds: int = 0, eval_sizes: list[int] | None = None, refit: bool = False,
           ssl_epochs: int = 0) -> None:
    """Queue the form's training run, or its cross-validation with ``cv_folds`` folds at the candidate sizes
    (``refit``: shipping one model refitted on all images; ``ssl_epochs``: SimCLR pretraining per fold)."""
    try:
        from covidscan.cv import CVOptions
        from covidscan.training.launch import submit_training

        cv = (CVOptions(folds=cv_folds, eval_sizes=tuple(eval_sizes or ()), refit=refit, ssl_epochs=ssl_epochs)
              if cv_folds else None)
        record = submit_training(form_config(), job_runner(), name=job_name.strip() or None, cv=cv)
    except CovidscanError as exc:
        st.error(f"Not launched: {exc}", icon=":material/error:")
        return
    st.session_state[JOB_KEY] = record.id
    st.query_params["job"] = record.id
    st.success(f"Launched {record.name} ({record.status}).", icon=":material/rocket_launch:")


# ------------------------------------------------------------------ runs table and comparison
def runs_section(records) -> None:
    st.subheader("Runs")
    if not records:
        st.info("No training runs yet. Start one above.", icon=":material/info:")
        return
    active = any(not record.done for record in records)
    st.fragment(_runs_table, run_every=TABLE_REFRESH_SECONDS if active else None)()


def _runs_table() -> None:
    records = job_runner().list()
    table = runs.runs_table(records)
    number = st.column_config.NumberColumn
    st.dataframe(table, hide_index=True, width="stretch", column_config={
        **{column: number(format="%.3f") for column in runs.BEST_COLUMNS.values()},
        "duration (s)": number(format="%.0f"),
        "status": st.column_config.TextColumn(width=STATUS_COLUMN_PX),  # "succeeded" in full
        "epochs": st.column_config.TextColumn(width=STATUS_COLUMN_PX),  # a cross-validation's "5 folds × 20" in full
        "why": st.column_config.TextColumn("why (failed / cancelled)", width="large"),
    })
    labels = {record.id: runs.run_label(record) for record in records}
    chosen = st.multiselect("Compare runs", list(labels), format_func=labels.get, key="train_compare",
                            placeholder="Pick runs to compare their curves and metrics")
    if not chosen:
        return
    picked = [record for record in records if record.id in chosen]
    frame = runs.comparison_frame(picked)
    if frame.empty:
        st.caption("None of these runs has finished an epoch yet.")
    else:
        metrics = [runs.METRIC_NAMES[key] for key in ("val_auc", "val_accuracy", "val_f1", "val_loss", "train_loss", "lr")
                   if runs.METRIC_NAMES[key] in set(frame["metric"])]
        for start in range(0, len(metrics), 3):
            columns = st.columns(3)
            for column, metric in zip(columns, metrics[start:start + 3]):
                column.altair_chart(charts.comparison_chart(frame, metric), width="stretch")
    st.dataframe(runs.comparison_table(picked), width="stretch")


# ------------------------------------------------------------------ the selected run
def pick_run(records) -> str:
    ids = [record.id for record in runs.newest_first(records)]
    wanted = st.query_params.get("job")
    if st.session_state.get(JOB_KEY) not in ids:
        active = [record.id for record in records if not record.done]
        st.session_state[JOB_KEY] = wanted if wanted in ids else (active[-1] if active else ids[0])
    labels = {record.id: runs.run_label(record) for record in records}  # the status shows below, live
    job_id = st.selectbox("Run", ids, format_func=labels.get, key=JOB_KEY)
    if st.query_params.get("job") != job_id:
        st.query_params["job"] = job_id
    return job_id


def live_view(job_id: str) -> None:
    """Status, progress, curves, log and Cancel of one job; re-run every few seconds while it is active."""
    from covidscan.jobs import read_metrics, read_progress

    runner = job_runner()
    record = runner.get(job_id)
    progress = read_progress(record.run_dir)
    color = STATUS_COLORS.get(record.status, "gray")
    st.markdown(f"#### {runs.run_label(record)} — :{color}[{record.status}]")
    seen = st.session_state.setdefault("train_seen_status", {})
    was_active = seen.get(job_id) not in (None, "succeeded", "failed", "cancelled")
    seen[job_id] = record.status

    if not record.done:
        summary = runs.progress_summary(record, progress)
        bar, cancel = st.columns([5, 1])
        bar.progress(summary.fraction, text=summary.text)
        if cancel.button("Cancel", icon=":material/stop_circle:", key=f"cancel_{job_id}"):
            record = runner.cancel(job_id)
            st.toast("Cancel requested: the run stops at its next step.")
    elif record.status == "succeeded":
        st.success(runs.progress_summary(record, progress).text, icon=":material/check_circle:")
    elif record.status == "failed":
        st.error(f"This run failed: {runs.why_not_succeeded(record)}", icon=":material/error:")
    else:
        st.warning(f"This run was cancelled: {runs.why_not_succeeded(record)}", icon=":material/cancel:")

    curves = runs.curves_frame(read_metrics(record.run_dir), runs.run_label(record))
    if curves.empty and (progress or {}).get("folds"):
        st.caption("A cross-validation run has one training run per fold: their curves are in its fold folders "
                   f"({record.run_dir}/r0-f0, …).")
    elif curves.empty:
        st.caption("Curves appear after the first epoch.")
    else:
        loss, metric, lr = st.columns(3)
        loss.altair_chart(charts.loss_chart(curves), width="stretch")
        metric.altair_chart(charts.metric_chart(curves), width="stretch")
        lr.altair_chart(charts.lr_chart(curves), width="stretch")
    with st.expander("Log (last lines)", expanded=not record.done or record.status == "failed"):
        text = runner.logs(job_id)
        st.code("\n".join(text.splitlines()[-LOG_LINES:]) or "(nothing logged yet)", language=None)
    if was_active and record.done:
        st.rerun(scope="app")  # the job just ended: refresh the table and show the report


def report_section(record) -> None:
    st.subheader("Run report")
    cross_validated = run_report.is_cross_validated(record.run_dir)
    if st.session_state.get(REPORT_KEY) != record.id:
        st.button("Open the run report", icon=":material/assessment:", key=f"report_{record.id}",
                  on_click=st.session_state.__setitem__, args=(REPORT_KEY, record.id))
        st.caption("Reads the cross-validation's out-of-fold estimate, with 95% intervals." if cross_validated else
                   "Evaluates the best model on the run's validation split (once; the result is kept).")
        return
    try:
        with st.spinner("Reading the out-of-fold predictions…" if cross_validated else
                        "Evaluating the model on its validation split…"):
            report = run_report.run_report(record.run_dir)
    except CovidscanError as exc:
        st.error(str(exc), icon=":material/error:")
        return
    st.caption(f"From {report.source}.")
    if report.protocol:
        st.caption(report.protocol)
    if report.note:
        st.info(report.note, icon=":material/info:")
    table, confusion = st.columns([1, 2] if not report.intervals else [3, 2])
    table.dataframe(run_report.report_metric_table(report), hide_index=True, width="stretch")
    if report.confusion:
        confusion.altair_chart(charts.confusion_chart(report), width="content")
    roc, wrong = st.columns(2)
    if report.roc:
        roc.altair_chart(charts.roc_chart(report), width="stretch")
    else:
        roc.caption(f"No ROC curve: it needs the {split_name(report.split)} images and both classes among them.")
    if report.misclassified:
        wrong.altair_chart(charts.misclassified_chart(report), width="stretch")
        with wrong.expander(f"Misclassified images ({len(report.misclassified)})"):
            st.dataframe(run_report.misclassified_frame(report), hide_index=True, width="stretch")
    elif report.roc:
        wrong.success(f"No {split_name(report.split)} image was misclassified.", icon=":material/check:")
    if report.reliability:
        chart, bins = st.columns(2)
        chart.altair_chart(charts.reliability_chart(report), width="stretch")
        bins.caption("Per confidence bin: how often the model is right when it is that sure (a calibrated model's "
                     "points lie on the diagonal; the larger the point, the more images in its bin).")
        bins.dataframe(run_report.reliability_frame(report), hide_index=True, width="stretch", column_config={
            column: st.column_config.NumberColumn(format="%.3f") for column in ("mean confidence", "accuracy")})
    cam_check_section(record)
    promote_section(record)


def cam_check_section(record) -> None:
    """Where the model looks over its validation split: Grad-CAM's share inside the lungs (CT runs)."""
    from covidscan import camcheck

    key = f"train_cam_check_{record.id}"
    with st.expander("Where does the model look? (Grad-CAM inside the lungs)", expanded=key in st.session_state):
        st.caption("Explains every validation slice with Grad-CAM and measures how much of each map lies inside "
                   "the automatic lung mask. A model that learned the arrows and captions of paper figures "
                   "looks outside the lungs.")
        if key not in st.session_state:
            if not st.button("Run the check", key=f"{key}_run", icon=":material/search:"):
                return
            try:
                with st.spinner("Explaining the validation slices…"):
                    st.session_state[key] = camcheck.run_cam_check(record.run_dir)
            except CovidscanError as exc:
                st.error(str(exc), icon=":material/error:")
                return
        check, predictor = st.session_state[key]
        if check["note"]:
            st.info(check["note"], icon=":material/info:")
        if check["mean_in_lungs"] is None:
            return
        mean_col, outside_col = st.columns(2)
        mean_col.metric("Mean share inside the lungs", f"{check['mean_in_lungs']:.0%}",
                        help=f"Over {check['n_with_mask']} validation slices with a lung mask.")
        outside_col.metric("Slices looked at mostly outside", f"{len(check['outside'])} of {check['n_with_mask']}")
        pictures = camcheck.outside_overlays(predictor, check, limit=8)
        for start in range(0, len(pictures), 4):
            for column, (caption, picture) in zip(st.columns(4), pictures[start:start + 4]):
                column.image(picture, caption=caption, width="stretch")


def promote_section(record) -> None:
    st.markdown("**Use this model on the Predict page**")
    already = [m.name for m in catalog.promoted_models()
               if (m.card.training or {}).get("promoted_from", {}).get("run") == record.id]
    if already:
        st.caption(f"Already available on the Predict page as: {', '.join(already)}.")
    name_col, button_col = st.columns([2, 1], vertical_alignment="bottom")
    default = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in record.name)[:64].strip("-.") or record.id
    name = name_col.text_input("Model name", value=default, key=f"promote_name_{record.id}",
                               help="Letters, digits, dots, dashes or underscores.")
    if button_col.button("Make available on the Predict page", icon=":material/publish:", key=f"promote_{record.id}"):
        try:
            path = catalog.promote(record, name)
        except CovidscanError as exc:
            st.error(str(exc), icon=":material/error:")
        else:
            st.success(f"Promoted as {path.name}: pick “{path.name}” in the Predict page's model list.",
                       icon=":material/check_circle:")


# ------------------------------------------------------------------ page
try:
    records = job_runner().list()
except CovidscanError as exc:
    st.error(f"The job runner is not available: {exc}", icon=":material/error:")
    st.stop()

launch_form(expanded=not records)
records = job_runner().list()  # a job launched just now is listed too
runs_section(records)
if records:
    st.subheader("Run")
    job_id = pick_run(records)
    selected = next(record for record in records if record.id == job_id)
    st.fragment(live_view, run_every=None if selected.done else REFRESH_SECONDS)(job_id)
    if selected.status == "succeeded":
        report_section(selected)
