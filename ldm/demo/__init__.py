"""The bundled demo model: a procedural shapes dataset, its classifier, and the training code."""
