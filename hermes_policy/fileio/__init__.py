"""Files in and out: JSON read with limits (policies, annotations), atomic writes."""
