"""The Streamlit app's pages and the pieces they share (charts.py: the Altair charts)."""
