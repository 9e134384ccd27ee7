"""covidscan Streamlit app: Predict, Train and Dataset explorer pages.

Run with ``streamlit run app.py``. Research and teaching use only: not a medical device.
"""
from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="covidscan", page_icon="🫁", layout="wide")

# The pages live in app_pages/, not pages/: Streamlit treats a pages/ folder as a legacy multipage
# app, and a first visit straight to /train would then run that file without this shell.
pages = [
    st.Page("app_pages/predict.py", title="Predict", icon=":material/image_search:", default=True),
    st.Page("app_pages/train.py", title="Train", icon=":material/model_training:"),
    st.Page("app_pages/explorer.py", title="Dataset explorer", icon=":material/dataset:"),
]
page = st.navigation(pages)
with st.sidebar:
    st.caption("covidscan · **research use only — not for diagnosis**")
page.run()
