"""Pretrained diffusion LMs from local Hugging Face directories (LLaDA, Dream, SDAR, Fast-dLLM v2,
LLaDA2, MDLM, BD3-LM): family detection, native transformers classes behind the Denoiser protocol,
tokenizers with their mask ids and chat templates."""
