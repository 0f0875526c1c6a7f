"""What every command shares: flags and the error exit (cli), the device and precision (hardware), torchrun
(ddp), the training toolbox (training), charts (plots), the LLM client (llm) and the prompter loader
(prompter). Plumbing only: the method itself lives in phi2/, lora.py, head_adapter.py and the trainers."""
