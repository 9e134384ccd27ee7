"""Dataset explorer page (placeholder until the explorer lands)."""
import streamlit as st

st.title("Dataset explorer")
st.info("The dataset explorer is coming soon.")
