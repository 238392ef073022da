"""The studio's theme: the system's own fonts, so the page loads no font at all (the issue asks for no
request outside this machine; only ``gr.themes.GoogleFont`` would reach out, but system fonts also
keep the page light)."""

import gradio as gr

THEME = gr.themes.Base(
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "monospace"],
)
