"""`make bench-peers`: splitfuse beside vLLM, OpenVINO GenAI, llama.cpp and transformers (run.py)."""
