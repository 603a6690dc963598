"""Knowledge distillation, teacher -> student: the losses, the teacher and student models, and the loop
extension that puts them together (extension.py). Importing the package loads none of them."""
