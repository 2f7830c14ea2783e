from __future__ import annotations

from django.urls import path

from examples.django_project import views

urlpatterns = [
    path("health", views.health),
    path("me", views.me),
]
