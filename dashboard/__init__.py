"""The Streamlit dashboard: the Dynamics tab and the verdict on the three questions."""
