"""Train page (placeholder until the Train page lands)."""
import streamlit as st

st.title("Train")
st.info("Training from the app is coming soon. Use `covidscan train` on the command line meanwhile.")
