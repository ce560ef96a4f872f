"""The engine behind the app and the CLIs: jobs, the run store and the models kept loaded. Never imports gradio."""
